package kennel.mms;

import java.io.IOException;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import software.amazon.ai.mms.servingsdk.Context;
import software.amazon.ai.mms.servingsdk.ModelServerEndpoint;
import software.amazon.ai.mms.servingsdk.annotations.Endpoint;
import software.amazon.ai.mms.servingsdk.annotations.helpers.EndpointTypes;
import software.amazon.ai.mms.servingsdk.http.Request;
import software.amazon.ai.mms.servingsdk.http.Response;

/**
 * GET /execution-parameters for SageMaker batch transform: MaxConcurrentTransforms,
 * BatchStrategy and MaxPayloadInMB. The launcher computes them from the SAGEMAKER_* settings
 * and the worker count and hands them over, already JSON, in KENNEL_EXECUTION_PARAMETERS
 * (kennel_serve.mms_toolkit.mms_config); MMS itself has no route for this path.
 */
@Endpoint(
        urlPattern = "execution-parameters",
        endpointType = EndpointTypes.INFERENCE,
        description = "Batch transform execution parameters")
public class ExecutionParametersEndpoint extends ModelServerEndpoint {

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        String parameters = System.getenv("KENNEL_EXECUTION_PARAMETERS");
        String body;
        if (parameters == null || parameters.isEmpty()) {
            rsp.setStatus(404, "Not Found");
            body = "{\"error\": \"execution parameters are not configured\"}\n";
        } else {
            rsp.setStatus(200, "OK");
            body = parameters + "\n";
        }
        rsp.setContentType("application/json");
        try (OutputStream out = rsp.getOutputStream()) {
            out.write(body.getBytes(StandardCharsets.UTF_8));
        }
    }

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        PingEndpoint.methodNotAllowed(rsp, "/execution-parameters");
    }

    @Override
    public void doPut(Request req, Response rsp, Context ctx) throws IOException {
        PingEndpoint.methodNotAllowed(rsp, "/execution-parameters");
    }

    @Override
    public void doDelete(Request req, Response rsp, Context ctx) throws IOException {
        PingEndpoint.methodNotAllowed(rsp, "/execution-parameters");
    }
}
