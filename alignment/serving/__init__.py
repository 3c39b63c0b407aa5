"""`align serve`: an OpenAI-compatible HTTP server, a web chat page and a blind arena over the one sampler.

- `engine`: the served models, the admission cap (requests running or waiting; more are refused with 503) and the
  worker threads that run `alignment.sampling.generate` with a streamer (`TokenStream`) that turns token ids into text
  deltas, honours stop strings and stops a generation whose client went away.
- `arena`: blind battles between two models, votes appended atomically as TRL preference rows plus a log of every vote
  with the model identities, and the tally (win rate with its standard error, `alignment.stats.win_rate`).
- `app`: the FastAPI application (the OpenAI endpoints, the arena endpoints, the page `web/index.html`); needs the
  `serve` extra (fastapi, uvicorn). Nothing else in `alignment/` imports this package.
"""
