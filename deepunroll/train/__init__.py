"""deepunroll.train"""
