"""The admin API's routes, one router per concern; :func:`streamengine.api.app.create_app` includes them."""
