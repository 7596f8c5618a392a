"""Model growth: operators that map a trained model's weights to a larger model's (``operators.py``), growth of a
checkpoint into a new one (``offline.py``, ``pretrain grow``) and the growth-timing rule (``plan.py``)."""
