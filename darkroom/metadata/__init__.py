"""Generation parameters inside images: the AUTOMATIC1111 infotext (`infotext`) and reading and
writing it in PNG, JPEG and WebP files of every webui (`images`). Core-level: imports only the
request model and the errors."""
