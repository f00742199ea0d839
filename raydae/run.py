"""Entry point that also works as a lone file: `ray submit cluster.yaml raydae/run.py -- ARGS`.

`ray submit` copies only this script to the head node, so it imports the *installed* raydae package.
`raydae run ARGS`, `python -m raydae.run ARGS` and `python raydae/run.py ARGS` are the same command;
a first argument naming another command runs that one (`raydae/run.py sweep sweeps/quick.yaml`).
"""

import os
import sys

if __name__ == "__main__":
    # Run as a file, Python puts this file's folder first on sys.path; drop it so that sibling modules
    # (e.g. `config.py`) cannot shadow anything and `raydae` resolves to the installed package.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    from raydae.cli import main

    other_commands = ("sweep", "study", "eval", "report", "sample")
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] and args[0] in other_commands else ["run", *args]))
