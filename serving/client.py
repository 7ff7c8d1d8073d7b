"""The endpoint's typed Python client: search, embed, rerank, pages (and deletes, health), with an API key.

It lives in the library, :mod:`ray_vdr.client`, so that jobs, promotion and the CLI use it without the serving
package (``ray_vdr`` never imports ``serving``); this module is the same client under the serving package's name. Its
answers are the wire models of :mod:`ray_vdr.protocol`::

    from serving.client import EndpointClient
    client = EndpointClient("http://127.0.0.1:8000/", api_key="...")
"""

from ray_vdr.client import EndpointClient, EndpointError

__all__ = ["EndpointClient", "EndpointError"]
