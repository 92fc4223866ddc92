"""Keeping the cache within its disk: access tracking, the sweeper, pins, the inventory.

``access.py`` counts pulls in memory and flushes them; ``db.py`` is the lifecycle's own
sqlite file beside the metadata (access times and counts, the manifest -> children graph,
tags seen, pins); ``plan.py`` is the pure planner (images, LRU, shared blobs, pins,
retention); ``sweeper.py`` runs a plan against a blob store (only ``list``, ``delete`` and
``local_path`` of it); ``space.py`` is the write-time check; ``pins.py`` the pin matcher.
"""
