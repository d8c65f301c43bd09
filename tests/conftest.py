pytest_plugins = ["tests.fake_openrouter"]
