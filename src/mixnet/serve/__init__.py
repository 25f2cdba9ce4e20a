"""``mixnet serve``: predictions over HTTP with dynamic batching (``app.py``) and a page to try it
(``page.html``). Needs the ``serve`` extra: ``pip install "mixnet[serve]"``."""
