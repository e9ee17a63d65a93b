"""API views: one APIView per operation; they parse, delegate and render."""
