"""`mt serve`: a trained model behind an HTTP JSON service (app.py) with a one-page front end (page.html)."""
