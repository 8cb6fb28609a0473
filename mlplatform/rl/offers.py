"""Offer tiers and the risk cap, as the RL part names them: the classes live in
``mlplatform.offer_tiers`` because the serving config (``serving.offers``) holds them too, and
the config layer must not import the RL part (which reads storage, which reads the config)."""

from mlplatform.offer_tiers import OfferConfig, OfferTier, RiskCap

__all__ = ["OfferConfig", "OfferTier", "RiskCap"]
