"""Python components referenced by the bundle's configs (``"_target_": "custom_components...."``)."""
