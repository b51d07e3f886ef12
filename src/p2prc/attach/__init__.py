"""Attached hosts (#16): machines that do not run p2prc, reached through gateway nodes.

``records`` (the signed record a gateway publishes, sans-IO), ``models`` (API bodies and the
merged view), ``store`` (the gateway's rows and the records pulled from other gateways),
``service`` (``AttachService``, ``node.attached``), ``client`` (``client.attached``).
"""
