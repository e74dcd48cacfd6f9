"""Does a new site look like the population the model was validated on? Shift tests of a site's
images against the bundle's `site_reference` (`covid-cxr site check`), and the serving monitor's
rolling window of recent answers. Torch-free: the server imports it."""
