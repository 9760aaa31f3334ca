"""The marker a plugin decorates its hook implementations with."""

import pluggy

hookimpl = pluggy.HookimplMarker("mcaudit")
