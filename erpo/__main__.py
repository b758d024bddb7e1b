import sys

from erpo.cli import main

if __name__ == "__main__":  # guarded: vLLM's engine process is spawned and re-imports the main module
    sys.exit(main())
