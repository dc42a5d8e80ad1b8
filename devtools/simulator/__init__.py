"""The Azure OpenAI simulator: its server, chat and Responses, tools and structured output, and
Azure's wire format as it speaks it.

It imports nothing of the other devtools packages, nor of the proxy it stands in front of.
"""
