"""Protocol adapters: transport and parser callbacks turned into exchange calls (HTTP/1.1 today)."""
