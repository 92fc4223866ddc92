"""Run ``mirrorcache`` with uvloop hidden, for ``bench/run.py --no-uvloop`` (an A/B of the
event loop: aiohttp's FileResponse can use sendfile only on asyncio's own loop)."""

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # `import uvloop` -> ImportError

from mirrorcache.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
