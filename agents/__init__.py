"""gdpo_listener.agents"""
