"""deepunroll.data"""
