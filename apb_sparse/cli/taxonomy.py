"""``apb taxonomy``: the surveyed methods in the survey's taxonomy, and the registry's names."""
from __future__ import annotations

import json

from .. import methods as registry
from .. import taxonomy


def _cmd_taxonomy(args, parser) -> int:
    entries = taxonomy.implemented() if args.implemented else None
    if args.json:
        print(json.dumps(taxonomy.as_dicts(entries), indent=1, default=str))
        return 0
    if args.markdown:
        print(taxonomy.to_markdown(entries))
    else:
        taxonomy.print_table(entries)
    surveyed = {m.implemented for m in taxonomy.METHODS if m.implemented}
    extra = [n for n in registry.available() if n not in surveyed]
    if extra:
        print(f"\nbaselines in the registry (not surveyed methods): {', '.join(extra)}")
    print(f"registry names for `apb run --methods`: {', '.join(registry.available())}")
    return 0
