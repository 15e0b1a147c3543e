"""gdpo_listener.rewards"""
