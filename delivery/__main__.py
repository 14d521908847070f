"""`wis2-delivery-monitor` / `python -m delivery`: run the delivery monitor."""

from __future__ import annotations

import sys

from pydantic import ValidationError


def main() -> int:
    from delivery.service import main as run

    try:
        return run()
    except ValidationError as exc:  # settings: name each bad variable
        problems = "; ".join(
            f"WIS2_DELIVERY_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors())
        sys.stderr.write(f"wis2-delivery-monitor: invalid settings: {problems}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
