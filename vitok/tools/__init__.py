def parse_with_config_overrides(parser, argv):
    """(args, ["--config.a.b=v", ...]): the parser's own flags, plus config overrides as on a
    training command line; any other argument is the parser's usual error."""
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, overrides


def add_tokenize_options(parser) -> None:
    """--quality / --budget: the options of a tokenizer that takes them (KARL)."""
    parser.add_argument(
        "--quality", type=float, default=None,
        help="KARL: the requested mean L1 error on [0, 1] pixels (e.g. 0.05)",
    )  # fmt: skip
    parser.add_argument("--budget", type=int, default=None, help="KARL: the most tokens per image")


def tokenize_options(args) -> dict:
    """The options given on the command line (checked by the tokenizer)."""
    return {k: getattr(args, k) for k in ("quality", "budget") if getattr(args, k) is not None}
