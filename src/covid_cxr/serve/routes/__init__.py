"""One router per protocol: operations (health, metrics), TF Serving REST, upload API, web page."""
