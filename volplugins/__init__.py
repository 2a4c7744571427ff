"""Pool forensics for Windows memory images: plugins and the library behind them."""
