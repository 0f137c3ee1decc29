"""expert_service"""
