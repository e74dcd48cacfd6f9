"""Does a new site look like the population the model was validated on? Shift tests of a site's
images against the bundle's `site_reference` (`covid-cxr site check`), and the serving monitor's
rolling window of recent answers. Torch-free: the server imports it."""

ALPHA = 0.01  # family-wise false-alarm level of one check
MIN_IMAGES = 10  # below it the verdict is "too few images"
