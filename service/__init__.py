"""The caption ranking service: a FastAPI app that loads a checkpoint and a caption index once.

Nothing heavy is imported here; ``service.main.create_app`` builds the app.
"""
