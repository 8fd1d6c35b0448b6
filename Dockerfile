# vendgate gateway image: build the wheel in one stage, run it as a non-root user in the next.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY protocol ./protocol
COPY float_ledger ./float_ledger
COPY admin_api ./admin_api
COPY terminal_sim ./terminal_sim
COPY loadtests ./loadtests
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 vendgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER vendgate
WORKDIR /home/vendgate
ENV VENDGATE_POS_HOST=0.0.0.0 VENDGATE_KIOSK_HOST=0.0.0.0 VENDGATE_HTTP_HOST=0.0.0.0
EXPOSE 7700 7443 7780
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7780/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["vendgate"]
CMD ["serve"]
