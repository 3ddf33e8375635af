"""timer:distro:sys: timers that processes set, and the deadline wheel behind them."""
