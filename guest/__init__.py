"""The guest side: the image every node boots (`build.py`) and the agent that runs in it (`agent.py`)."""
