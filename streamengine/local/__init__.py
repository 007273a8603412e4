"""`streamengine up`: an embedded broker, database and S3 server, a tiny model and a demo producer."""
