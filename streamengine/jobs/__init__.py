"""Job scheduling (threshold and cron tick) and trainer workers."""
