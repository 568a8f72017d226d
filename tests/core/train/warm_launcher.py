"""Start `lora-studio` commands as processes of their own without paying the seconds of imports each time: this
process imports the CLI's libraries once (after routing their output to the log, as `main()` does), then forks one
child per command that runs `studio.cli.main(argv)` and exits with its code. Nothing has run torch here before a
fork, so the children start clean. A test kills a child by its pid as it would any process.

Protocol, one JSON line each way: the test writes an argv list; this process answers {"pid": N} once the child runs
and {"pid": N, "status": S} when it ended (S: the exit code, or minus the signal that ended it)."""

from __future__ import annotations

import json
import os
import sys
import traceback

from studio.core.logs import send_library_output_to_log


def main() -> None:
    send_library_output_to_log()
    import accelerate  # noqa: F401 - warmed up before the first fork
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import studio.cli
    import studio.core.train.engine  # noqa: F401

    for line in sys.stdin:
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                code = studio.cli.main(argv)
            except BaseException:  # noqa: BLE001 - shown as the interpreter would, then the child ends
                traceback.print_exc()
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"pid": pid, "status": code}), flush=True)


if __name__ == "__main__":
    main()
