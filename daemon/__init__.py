"""perksync: PayNow inventory → in-game perks over RCON, exactly once."""

__version__ = "0.1.0"
