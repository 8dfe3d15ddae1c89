"""deepunroll.nets"""
