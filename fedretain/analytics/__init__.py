"""Federated analytics with differential privacy: retention curves and KPIs across merchants.

``queries`` (what is asked, exact per-node cells), ``mechanisms`` (Gaussian noise),
``charge`` (privacy budget ledger), ``intervals`` (confidence intervals, suppression),
``results`` (the server's sum of noisy answers), ``plots`` (PNG figures).
Nothing here imports Flower; ``fedretain.clients.analytics_handlers`` and
``fedretain.server.analytics`` wire it to messages.
"""
