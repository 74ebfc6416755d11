"""``snnet serve``: one stitchable network served for every budget (LitServe).

``launch`` checks the files and starts the server, ``api`` is the server (HTTP process and inference
worker), ``request`` checks a request and resolves its stitch, ``policy`` chooses a stitch for the
requests that name none, ``stats`` is what ``GET /stats`` reports, ``page`` is ``GET /``.
"""
