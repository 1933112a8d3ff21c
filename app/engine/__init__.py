"""The continuous-batching engine: input (tokenize off the event loop), the scheduler (the owner of every
request's status), the step executor and the model runner over the ragged KV cache, sampling, and the output
stage (text, stop strings, events, the one retirement). Never imports FastAPI or the API's schemas."""
