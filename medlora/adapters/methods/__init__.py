"""Built-in adapter methods, one module per method family; importing this package registers them.

Every module in this package is imported, so a new method is added by dropping a file here.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
