"""Using a model: ``predict`` on photos, ``validate`` on a labelled folder."""
