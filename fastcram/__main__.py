import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the command line is even read: no traceback
    print("fastcram: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
