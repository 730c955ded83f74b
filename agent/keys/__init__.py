"""Who may use this agent's OpenAI routes: the API keys it knows (``source``) and the check each
request passes before it is routed. The key format and the decision table are the library's
(``gpufleet/apikeys.py``); this package only keeps the set current and applies it."""
