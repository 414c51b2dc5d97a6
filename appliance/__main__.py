from appliance.cli import main

# Guarded: the batcher's worker processes (multiprocessing "spawn") import this module again.
if __name__ == "__main__":
    raise SystemExit(main())
