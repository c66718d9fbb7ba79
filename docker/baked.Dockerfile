# The service image with the serving export inside it, for hosts that cannot mount a volume. Its build context is
# the export folder itself, so nothing else of the repository is sent to the engine:
#   make docker-image && docker build -f docker/baked.Dockerfile -t reco-lab-service:baked models
# The files keep the modes `reco-lab run` gives them (folders 0755, files 0644) and belong to root: uid 10001
# reads them and cannot change them.
ARG SERVICE_IMAGE=reco-lab-service
FROM ${SERVICE_IMAGE}
COPY . /models
