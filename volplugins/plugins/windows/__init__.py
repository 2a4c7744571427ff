"""Windows plugins of the pool forensics suite.

Volatility 3 imports this directory as ``volatility3.plugins.windows`` when it
is given with ``-p``; the ``__path__`` below merges it with every other
plugin directory so Volatility 3's own Windows plugins stay importable.
"""

import os
import sys

_parent_name, _own_name = __name__.rsplit(".", 1)
__path__ = [os.path.join(path, _own_name) for path in sys.modules[_parent_name].__path__]
