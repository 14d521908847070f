"""The delivery monitor (`wis2-delivery-monitor`): did the Global Brokers relay, the Global
Caches cache and the Global Discovery Catalogue accept what this node published?"""
