"""Runs ``python -m vitok.train`` argument lists, each in a child forked from one process that
has imported vitok once (those imports are most of what a start-up error costs).

    python tests/forked_cli.py '[["--config=...", ...], ...]'  ->  JSON [[exit code, output], ...]

Each child is a real process running ``vitok.train.main``: its exit code and everything it
writes to file descriptors 1 and 2 (a traceback included) are what a user's terminal shows.
"""

import json
import os
import sys
import traceback


def run_forked(argv: list[str]) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: behave like `python -m vitok.train ARGV`
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        code = 0
        try:
            from vitok import train

            train.main(argv)
        except SystemExit as e:
            if isinstance(e.code, str):  # what the interpreter does with SystemExit("text")
                print(e.code, file=sys.stderr)
                code = 1
            else:
                code = e.code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


if __name__ == "__main__":
    import vitok.train  # noqa: F401  (once, before any fork)

    print(json.dumps([run_forked(argv) for argv in json.loads(sys.argv[1])]))
