"""Image entry point: `python -m kennel_serve serve` (SageMaker runs `docker run IMAGE serve`)."""
from __future__ import annotations

import sys

USAGE = "usage: python -m kennel_serve serve   (the SageMaker inference contract on port 8080)"


def main(argv: list[str]) -> int:
    if argv[:1] in ([], ["serve"]) and len(argv) <= 1:
        from kennel_serve.mms_toolkit import launcher
        return launcher.main()
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        from kennel_serve.settings import SETTINGS
        print(USAGE + "\n\nsettings (environment variables; docs/serving.md, Settings):")
        for setting in SETTINGS:
            print(f"  {setting.name:<40} {setting.default.replace('`', '')}: {setting.meaning.replace('`', '')}")
        return 0
    print(f"kennel-serve: unknown command {' '.join(argv)!r}; {USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
