"""One APIRouter per resource; serve/app.py includes them, with the API key check where the settings demand it."""
